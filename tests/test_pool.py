"""The process pool, driven in-process: real ``python -m argon.runner`` children on pipes.

Functions sent to the pool are lambdas or nested functions: they travel by value, since
the pool processes cannot import this test module.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import os
import resource
import signal
import struct
import sys
import termios
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.subprocess
import psutil
import pytest

from argon import defaults
from argon.backoff import Backoff
from argon.errors import ProcessDied
from argon.pool import Pool, default_size
from argon.process import Job
from argon.protocol import Failure, Result, Task
from argon.serialize import FunctionCache, dumps, loads, loads_exception

from conftest import child_env, wait_for

_ids = itertools.count(1)
_functions = FunctionCache()

getpid = lambda: os.getpid()  # noqa: E731


def _make_hold():
    # Nested, so it travels by value. Holds its process until ``path`` exists (at most 30 s).
    def hold(path):
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.getpid()

    return hold


hold = _make_hold()


def make_task(func: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Task:
    return Task(next(_ids), _functions.dumps(func), dumps((args, kwargs)), timeout)


def submit(pool: Pool, func: Callable[..., Any], *args: Any, timeout: float | None = None, tag: Any = None,
           **kwargs: Any) -> gevent.event.AsyncResult:
    """Queue ``func(*args, **kwargs)``; the AsyncResult receives the Result or Failure."""
    reply = gevent.event.AsyncResult()
    pool.submit(Job(make_task(func, *args, timeout=timeout, **kwargs), reply.set, tag))
    return reply


def run(pool: Pool, func: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """Run one task and return its reply."""
    return submit(pool, func, *args, timeout=timeout, **kwargs).get(timeout=30)


def value(reply: Any) -> Any:
    assert type(reply) is Result, reply
    return loads(reply.value)


def _is_runner(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE and "argon.runner" in proc.cmdline()
    except psutil.Error:
        return False


class Runners:
    """The pool processes this test started: our live children running argon.runner.

    Those alive when it was created (left by another test) are not counted.
    """

    def __init__(self) -> None:
        self.before = {proc.pid for proc in self._all()}

    @staticmethod
    def _all() -> list[psutil.Process]:
        return [child for child in psutil.Process().children() if _is_runner(child)]

    def __call__(self) -> list[psutil.Process]:
        return [proc for proc in self._all() if proc.pid not in self.before]

    def pids(self) -> set[int]:
        return {proc.pid for proc in self()}

    def kill(self) -> None:
        for proc in self():
            with contextlib.suppress(psutil.Error):
                proc.kill()
                proc.wait(10)


def _pid_alive(pid: int) -> bool:
    try:
        return _is_runner(psutil.Process(pid))
    except psutil.Error:
        return False


@pytest.fixture
def runners() -> Iterator[Runners]:
    """Checks, once the test is over, that every pool process it started has exited (kills any left)."""
    started = Runners()
    try:
        yield started
        wait_for(lambda: not started(), timeout=10, what="every pool process to exit")
    finally:
        started.kill()


@pytest.fixture
def pools(runners) -> Iterator[Callable[..., Pool]]:
    """Start pools; close them all when the test ends."""
    started: list[Pool] = []

    def start(size: int = 1, **kwargs: Any) -> Pool:
        pool = Pool(size, **kwargs)
        started.append(pool)
        pool.start()
        return pool

    try:
        yield start
    finally:
        for pool in started:
            pool.close()


# -- replies ------------------------------------------------------------------------------------


def test_results_come_back_as_result_messages(pools, runners):
    pool = pools(2)
    assert len(runners()) == 2
    task = make_task(lambda x, y=1: [x * y, os.getpid()], 6, y=7)
    reply = gevent.event.AsyncResult()
    pool.submit(Job(task, reply.set))
    result = reply.get(timeout=30)
    assert type(result) is Result
    assert result.id == task.id
    product, pid = loads(result.value)
    assert product == 42
    assert pid in runners.pids()
    assert value(run(pool, lambda: None)) is None
    assert value(run(pool, lambda blob: blob[::-1], os.urandom(1 << 20) + b"end"))[:3] == b"dne"
    assert pool.completed == 3 and pool.failed == 0


def test_task_exceptions_come_back_as_task_error_failures(pools):
    pool = pools(1)

    def fails(x):
        raise ValueError(f"bad value {x}")

    pid = value(run(pool, getpid))
    task = make_task(fails, 3)
    reply = gevent.event.AsyncResult()
    pool.submit(Job(task, reply.set))
    failure = reply.get(timeout=30)
    assert type(failure) is Failure
    assert failure.id == task.id
    assert failure.error == "TaskError"
    assert failure.message == "builtins.ValueError: bad value 3"
    assert "fails" in failure.traceback
    exc = loads_exception(failure.payload, failure.message, failure.traceback)
    assert type(exc) is ValueError and exc.args == ("bad value 3",)
    # SystemExit is the task's own error too: the process survives it.
    exit_failure = run(pool, lambda: sys.exit(5))
    assert exit_failure.error == "TaskError" and "SystemExit" in exit_failure.message
    assert value(run(pool, getpid)) == pid
    assert pool.failed == 2 and pool.replaced == 0


def test_task_that_exits_fails_with_process_died_and_is_replaced(pools):
    pool = pools(1)
    before = value(run(pool, getpid))
    failure = run(pool, lambda: os._exit(3))
    assert type(failure) is Failure
    assert failure.error == "ProcessDied"
    assert "exited with code 3" in failure.message
    assert str(before) in failure.message
    after = value(run(pool, getpid))
    assert after != before
    assert not _pid_alive(before)
    assert pool.replaced == 1


def _make_crash():
    def crash():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the working directory
        return ctypes.string_at(0)

    return crash


def test_task_that_segfaults_fails_with_process_died(pools):
    pool = pools(1)
    before = value(run(pool, getpid))
    failure = run(pool, _make_crash())
    assert failure.error == "ProcessDied"
    assert "signal 11" in failure.message and "SIGSEGV" in failure.message
    assert value(run(pool, lambda x: x + 1, 1)) == 2
    assert value(run(pool, getpid)) != before


def test_task_that_kills_its_process_fails_with_process_died(pools):
    pool = pools(1)
    before = value(run(pool, getpid))
    failure = run(pool, lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert failure.error == "ProcessDied"
    assert "signal 9" in failure.message and "SIGKILL" in failure.message
    assert value(run(pool, getpid)) != before


def test_task_past_its_time_limit_fails_and_its_process_is_replaced(pools):
    pool = pools(1)
    before = value(run(pool, getpid))
    start = time.monotonic()
    failure = run(pool, lambda: time.sleep(30), timeout=0.3)
    elapsed = time.monotonic() - start
    assert failure.error == "TaskTimeout"
    assert "0.3s" in failure.message
    assert elapsed < 10  # killed at its limit (then replaced), not after the 30 s sleep
    assert not _pid_alive(before)
    after = value(run(pool, getpid, timeout=10))  # a task within its limit is not affected
    assert after != before
    assert pool.replaced == 1


def test_print_inside_a_task_does_not_corrupt_the_frames(pools):
    pool = pools(1)

    def noisy(n):
        print("hello from the task " * 50)
        sys.stdout.write("x" * 10_000)
        sys.stdout.flush()
        sys.stdout.buffer.write(b"\x00\x00\x00\x05junk")
        sys.stdout.flush()
        os.write(1, b"\x00\x00\x00\x03\x93\x03\x01")  # looks like a frame, straight to fd 1
        print("unflushed at return", end="")
        return n * 2

    pid = value(run(pool, getpid))
    assert value(run(pool, noisy, 21)) == 42
    assert value(run(pool, noisy, 5)) == 10
    assert value(run(pool, getpid)) == pid  # the same process, still in step


def test_reading_stdin_inside_a_task_gets_end_of_file(pools):
    pool = pools(1)
    pid = value(run(pool, getpid))
    assert value(run(pool, lambda: [sys.stdin.read(), os.read(0, 100), sys.stdin.buffer.read(10)])) == ["", b"", b""]
    failure = run(pool, input)
    assert failure.error == "TaskError" and "EOFError" in failure.message
    # The frames that followed were not eaten by the task.
    assert [value(run(pool, lambda i: i, i)) for i in range(3)] == [0, 1, 2]
    assert value(run(pool, getpid)) == pid


def test_a_result_that_cannot_be_serialized_fails_as_a_task_error(pools):
    pool = pools(1)
    pid = value(run(pool, getpid))
    failure = run(pool, lambda: (i for i in range(3)))
    assert failure.error == "TaskError"
    assert "generator" in failure.message
    assert value(run(pool, getpid)) == pid


def test_an_oversized_result_fails_with_a_clear_reason(pools):
    pool = pools(1, max_frame=1 << 20)
    pid = value(run(pool, getpid))
    failure = run(pool, lambda: b"x" * (2 << 20))
    assert type(failure) is Failure
    assert failure.error != "ProcessDied"
    assert "exceeds" in failure.message and str(1 << 20) in failure.message
    assert value(run(pool, getpid)) == pid  # the process was healthy: it is still serving
    assert pool.replaced == 0


# -- recycling and queueing -----------------------------------------------------------------------


def test_max_requests_recycles_processes(pools, runners):
    pool = pools(1, max_requests=3)
    pids = [value(run(pool, getpid)) for _ in range(9)]
    first, second, third = pids[0], pids[3], pids[6]
    assert pids == [first] * 3 + [second] * 3 + [third] * 3
    assert len({first, second, third}) == 3
    assert pool.replaced == 3
    wait_for(lambda: not _pid_alive(first) and not _pid_alive(second) and not _pid_alive(third),
             timeout=10, what="retired processes to exit")
    (current,) = runners()  # the third one's successor, and no spare left behind
    assert current.pid not in {first, second, third}
    assert value(run(pool, getpid)) == current.pid


def test_thirty_queued_tasks_all_complete_with_recycling(pools):
    pool = pools(2, max_requests=3)
    work = lambda i: [i, i * i, os.getpid()]  # noqa: E731
    replies = [submit(pool, work, i) for i in range(30)]
    assert pool.queued + pool.running == 30
    assert pool.join(60)
    results = [value(reply.get(timeout=0)) for reply in replies]
    assert [i for i, _, _ in results] == list(range(30))
    assert all(square == i * i for i, square, _ in results)
    per_process = Counter(pid for _, _, pid in results)
    assert len(per_process) == 10
    assert set(per_process.values()) == {3}
    assert pool.completed == 30 and pool.failed == 0 and pool.outstanding == 0


def test_jobs_run_in_submission_order(pools):
    pool = pools(1)
    order = []
    tasks = [make_task(lambda i: i, i) for i in range(10)]
    for task in tasks:
        pool.submit(Job(task, lambda reply: order.append(reply.id)))
    assert pool.join(30)
    assert order == [task.id for task in tasks]


def test_an_error_in_a_done_callback_does_not_stop_the_pool(pools):
    pool = pools(1)

    def explode(reply):
        raise RuntimeError("callback bug")

    pool.submit(Job(make_task(lambda: 1), explode))
    assert value(run(pool, lambda: 2)) == 2
    assert pool.completed == 2


def test_cancel_removes_queued_jobs_only(pools, runners, tmp_path):
    pool = pools(1)
    release = tmp_path / "release"
    running = submit(pool, hold, str(release), tag="running")
    wait_for(lambda: pool.running == 1, what="the first job to start")
    queued = {tag: submit(pool, lambda t: t, tag, tag=tag) for tag in ("a", "b", "keep", "c")}
    assert pool.queued == 4

    dropped = pool.cancel(lambda job: job.tag != "keep")
    assert sorted(job.tag for job in dropped) == ["a", "b", "c"]  # not the running job
    assert pool.queued == 1
    assert pool.cancel(lambda job: job.tag == "running") == []

    release.touch()
    assert value(running.get(timeout=30)) in runners.pids()
    assert value(queued["keep"].get(timeout=30)) == "keep"
    assert pool.join(10)
    assert pool.outstanding == 0
    assert not any(queued[tag].ready() for tag in ("a", "b", "c"))
    assert pool.completed == 2


def test_default_size_is_the_cpus_this_process_may_use():
    assert default_size() == len(os.sched_getaffinity(0))
    assert Pool().size == default_size()  # not started: no process to clean up
    assert Pool(3).size == 3


# -- lifetime -----------------------------------------------------------------------------------

_PARENT = textwrap.dedent("""
    import os, sys, time
    import gevent
    from argon.pool import Pool
    from argon.process import Job
    from argon.protocol import Task
    from argon.serialize import FunctionCache, dumps

    mode, marker = sys.argv[1], sys.argv[2]
    pool = Pool(2)
    pool.start()
    if mode == "busy":
        def hold(path):
            open(path, "w").close()
            time.sleep(60)

        pool.submit(Job(Task(1, FunctionCache().dumps(hold), dumps(((marker,), None))), lambda reply: None))
        deadline = time.monotonic() + 30
        while not os.path.exists(marker):
            if time.monotonic() > deadline:
                sys.exit("the task never started")
            gevent.sleep(0.01)
    print(" ".join(str(row["pid"]) for row in pool.processes()), flush=True)
    os._exit(0)
""")


@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_pool_processes_exit_when_their_parent_dies(mode, tmp_path):
    marker = tmp_path / "started"
    with open(tmp_path / "parent.log", "wb") as log:
        proc = gevent.subprocess.run([sys.executable, "-c", _PARENT, mode, str(marker)], stdout=gevent.subprocess.PIPE,
                                     stderr=log, env=child_env(), timeout=60)
    assert proc.returncode == 0, (tmp_path / "parent.log").read_text()
    pids = [int(word) for word in proc.stdout.split()]
    assert len(pids) == 2
    assert mode == "idle" or marker.exists()
    try:
        # A busy process sleeps 60 s: only the parent's death can end it this soon.
        wait_for(lambda: not any(_pid_alive(pid) for pid in pids), timeout=10,
                 what=f"pool processes {pids} to exit after their parent died")
    finally:
        for pid in pids:
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _unread(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def _started_and_greeted(pid: int) -> bool:
    """The runner ``pid`` has said hello, the pool has read it, and it waits for a task.

    Black box: the runner sleeps waiting on its empty pipe and socket (in ``select``), and
    the pipes this process shares with it hold no unread byte (the pool reads the hello and
    finishes starting the process without yielding in between).
    """
    try:
        with open(f"/proc/{pid}/wchan") as wchan:
            waiting = wchan.read()
        theirs = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    if "poll" not in waiting and "select" not in waiting:
        return False
    shared = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("pipe:") and link in theirs:
                shared.append(int(fd))
    return bool(shared) and all(_unread(fd) == 0 for fd in shared)


def test_close_stops_a_warmed_up_successor(tmp_path):
    runners = Runners()
    pool = Pool(1, max_requests=2)
    pool.start()
    try:
        (first,) = runners()
        if not _started_and_greeted(first.pid):  # an idle, ready process: the check must see it
            pytest.skip("cannot observe a pool process waiting on its pipe here (/proc/PID/wchan)")
        assert value(run(pool, getpid)) == first.pid
        submit(pool, hold, str(tmp_path / "never"))  # the process's last task: its successor starts now
        successor = wait_for(lambda: [p for p in runners() if p.pid != first.pid], what="the successor")[0]
        wait_for(lambda: _started_and_greeted(successor.pid), what="the successor to be ready")
        pool.close()
        wait_for(lambda: not runners(), timeout=3, what="every pool process to exit after close()")
    finally:
        pool.close()
        runners.kill()


# -- bounded restarts (issue 10) ----------------------------------------------------------------


def _fast_restart(attempts: int = 2) -> Callable[[], Backoff]:
    return lambda: Backoff(0.01, 2.0, 0.05, jitter=0, attempts=attempts)


@pytest.mark.timeout(30)
def test_a_pool_whose_processes_cannot_start_says_so_instead_of_retrying_forever(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 7\n")
    broken.chmod(0o755)
    pool = Pool(2, python=str(broken), restart=_fast_restart(2))
    started = time.monotonic()
    with pytest.raises(ProcessDied, match=r"cannot start a pool process \(3 attempts; last: .*exited with code 7"):
        pool.start()
    assert time.monotonic() - started < 10
    pool.close()


@pytest.mark.timeout(60)
def test_a_process_that_cannot_be_replaced_breaks_the_pool_loudly(runners, tmp_path):
    reasons: list[str] = []
    pool = Pool(1, on_broken=reasons.append, restart=_fast_restart(1))
    pool.start()
    try:
        assert value(run(pool, lambda: "fine")) == "fine"
        broken = tmp_path / "python"
        broken.write_text("#!/bin/sh\nexit 9\n")
        broken.chmod(0o755)
        pool.python = str(broken)  # from now on, no process can start
        dying = submit(pool, lambda: os._exit(3))
        waiting = submit(pool, lambda: "never")  # queued behind it
        assert dying.get(timeout=30).error == "ProcessDied"
        assert waiting.get(timeout=30).error == "ProcessDied"
        wait_for(lambda: reasons, 10, what="the pool to report itself broken")
        assert "cannot start a pool process (2 attempts" in reasons[0]
        late = run(pool, lambda: "never")  # fails at once, never waits for ever
        assert type(late) is Failure and "no pool process can start" in late.message
        assert pool.broken is not None and pool.outstanding == 0
    finally:
        pool.close()


def test_backoff_delays_grow_are_capped_and_bounded_without_sleeping():
    backoff = Backoff(0.1, 2.0, 0.5, jitter=0, attempts=5)
    assert [backoff.next_delay() for _ in range(6)] == [0.1, 0.2, 0.4, 0.5, 0.5, None]
    backoff.reset()
    assert backoff.next_delay() == 0.1
    low = Backoff(1.0, 2.0, 10.0, jitter=0.2, rng=lambda: 0.0)
    high = Backoff(1.0, 2.0, 10.0, jitter=0.2, rng=lambda: 0.999999)
    assert low.next_delay() == pytest.approx(0.8) and high.next_delay() == pytest.approx(1.2, abs=1e-5)


def test_backoff_within_a_time_budget_uses_the_injected_clock():
    now = [100.0]
    backoff = Backoff(1.0, 2.0, 8.0, jitter=0, within=5.0, clock=lambda: now[0])
    assert backoff.next_delay() == 1.0
    now[0] += 1.0
    assert backoff.next_delay() == 2.0
    now[0] += 2.0
    assert backoff.next_delay() == 2.0  # 4.0 would run past the budget: cut to what is left
    now[0] += 2.0
    assert backoff.next_delay() is None
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_backoff_presets_take_their_constants_from_defaults():
    reconnect = Backoff.reconnect(rng=lambda: 0.5)
    delays = [reconnect.next_delay() for _ in range(20)]
    assert delays[0] == defaults.RECONNECT_DELAY and max(delays) == defaults.RECONNECT_MAX_DELAY
    pool_start = Backoff.pool_start(rng=lambda: 0.5)
    assert sum(1 for _ in iter(pool_start.next_delay, None)) == defaults.POOL_START_ATTEMPTS


# -- pipelining: a small task waits behind a running one, and can be taken back (issue 12) -----


def _make_gate():
    # Nested, so it travels by value. Says it started (``started`` file), then holds its
    # process until ``release`` exists (at most 30 s).
    def gate(started, release):
        with open(started, "w"):
            pass
        deadline = time.monotonic() + 30
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.getpid()

    return gate


gate = _make_gate()


def _make_log_run():
    # Nested, so it travels by value. Appends ``name`` to ``path`` (one line, one write) and
    # returns the process id: the file tells how many times each task ran. It takes 2 ms,
    # so a task pipelined behind it usually waits long enough to be taken back.
    def log_run(path, name):
        time.sleep(0.002)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            os.close(fd)
        return os.getpid()

    return log_run


log_run = _make_log_run()


def _pipelined(pool: Pool) -> list[Job]:
    """The jobs pipelined behind running ones (white box: whether the path under test is taken)."""
    return [job for process in pool._processes for job, _ in process.waiting]


def _held(pool: Pool, tmp_path: Any, release: str = "never", timeout: float | None = None) -> Any:
    """Start a task that runs until ``tmp_path / release`` exists; return its reply once it runs."""
    reply = submit(pool, gate, str(tmp_path / "started"), str(tmp_path / release), timeout=timeout)
    wait_for(lambda: (tmp_path / "started").exists(), what="the long task to start")
    return reply


def _pipelined_behind(process: Any) -> list[Job]:
    return [job for job, _ in process.waiting]


@pytest.mark.timeout(60)
def test_a_pipelined_task_taken_back_is_never_run_twice(pools, tmp_path):
    pool = pools(2)
    runs = tmp_path / "runs"
    done: Counter[int] = Counter()
    taken_from_pipelines = 0

    def send(task: Task, name: int) -> None:
        pool.submit(Job(task, lambda reply: done.update([name]), name))

    tasks = [make_task(log_run, str(runs), name) for name in range(600)]
    for name in range(40):
        send(tasks[name], name)
    for name in range(40, 600):
        send(tasks[name], name)
        if name % 5 == 0:
            # Take back every waiting task (or the newest few), as a manager's Reclaim or a
            # hand-back does, and send them again.
            gevent.sleep(0)  # let replies in: processes finish and take their pipelined tasks
            behind = {id(job) for job in _pipelined(pool)}
            for job in pool.cancel(lambda job: True, limit=None if name % 2 else 3):
                taken_from_pipelines += id(job) in behind
                send(job.task, job.tag)
    assert pool.join(45)
    assert done == Counter(range(600))  # one reply each
    assert Counter(int(line) for line in runs.read_text().split()) == Counter(range(600))  # one run each
    assert taken_from_pipelines > 0, "no pipelined task was taken back: the test did not test it"
    assert pool.outstanding == 0 and pool.queued == 0


@pytest.mark.timeout(60)
def test_a_task_pipelined_behind_a_long_one_moves_to_the_process_that_frees_up(pools, tmp_path):
    pool = pools(2)
    first, second = (submit(pool, gate, str(tmp_path / f"started-{n}"), str(tmp_path / f"release-{n}"), tag=n)
                     for n in (1, 2))
    wait_for(lambda: all((tmp_path / f"started-{n}").exists() for n in (1, 2)), what="both long tasks to start")
    short = submit(pool, getpid, tag="short")
    (waiting,) = wait_for(lambda: _pipelined(pool), what="the short task to be pipelined")
    assert waiting.tag == "short" and pool.queued == 1 and pool.running == 2
    (behind,) = [process for process in pool._processes if waiting in _pipelined_behind(process)]
    assert behind.job is not None
    other = 2 if behind.job.tag == 1 else 1
    (tmp_path / f"release-{other}").touch()  # the other process frees up; the long task ahead of it holds on
    freed = value((first, second)[other - 1].get(timeout=30))
    assert value(short.get(timeout=10)) == freed  # ran there, not behind the long task
    assert not (first if other == 2 else second).ready()
    (tmp_path / f"release-{3 - other}").touch()
    assert pool.join(30)


@pytest.mark.timeout(60)
def test_killing_a_process_with_a_task_pipelined_behind_its_own(pools, tmp_path):
    pool = pools(1)
    runs = tmp_path / "runs"
    running = _held(pool, tmp_path)
    waiting = submit(pool, log_run, str(runs), 7)
    wait_for(lambda: _pipelined(pool), what="the second task to be pipelined")
    (victim,) = pool._processes
    os.kill(victim.pid, signal.SIGKILL)
    failure = running.get(timeout=30)
    assert type(failure) is Failure and failure.error == "ProcessDied"
    assert str(victim.pid) in failure.message
    assert value(waiting.get(timeout=30)) != victim.pid  # it ran on the replacement
    assert runs.read_text().split() == ["7"]  # once
    assert pool.join(10) and pool.queued == 0 and pool.running == 0


@pytest.mark.timeout(60)
def test_a_task_past_its_time_limit_does_not_take_the_task_pipelined_behind_it_down(pools, tmp_path):
    pool = pools(1)
    runs = tmp_path / "runs"
    slow = _held(pool, tmp_path, timeout=1.0)
    waiting = submit(pool, log_run, str(runs), 3)
    assert _pipelined(pool), "the second task was not pipelined: the test does not test it"
    failure = slow.get(timeout=30)
    assert type(failure) is Failure and failure.error == "TaskTimeout"
    value(waiting.get(timeout=30))
    assert runs.read_text().split() == ["3"]
    assert pool.join(10) and pool.queued == 0 and pool.running == 0


@pytest.mark.timeout(60)
def test_every_task_queued_behind_a_long_one_moves_to_the_process_that_frees_up(pools, tmp_path):
    pool = pools(2, depth=3)
    longs = [submit(pool, gate, str(tmp_path / f"started-{n}"), str(tmp_path / f"release-{n}"), tag=n)
             for n in (1, 2)]
    wait_for(lambda: all((tmp_path / f"started-{n}").exists() for n in (1, 2)), what="both long tasks to start")
    shorts = [submit(pool, getpid, tag="short") for _ in range(6)]
    wait_for(lambda: len(_pipelined(pool)) == 6, what="six short tasks to be pipelined")
    assert sorted(len(process.waiting) for process in pool._processes) == [3, 3]  # evenly, up to the depth
    (tmp_path / "release-1").touch()  # one process frees up; the long task ahead of the others holds on
    freed = value(longs[0].get(timeout=30))
    assert [value(short.get(timeout=10)) for short in shorts] == [freed] * 6  # none waited behind the long one
    assert not longs[1].ready()
    (tmp_path / "release-2").touch()
    assert pool.join(30) and pool.queued == 0


@pytest.mark.timeout(60)
def test_killing_a_process_with_several_tasks_pipelined_behind_its_own(pools, tmp_path):
    pool = pools(1, depth=3)
    runs = tmp_path / "runs"
    running = _held(pool, tmp_path)
    waiting = [submit(pool, log_run, str(runs), name) for name in range(5)]
    wait_for(lambda: len(_pipelined(pool)) == 3 and pool.queued == 5, what="three tasks pipelined, two queued")
    (victim,) = pool._processes
    os.kill(victim.pid, signal.SIGKILL)
    failure = running.get(timeout=30)
    assert type(failure) is Failure and failure.error == "ProcessDied"
    assert all(value(reply.get(timeout=30)) != victim.pid for reply in waiting)  # all on the replacement
    assert runs.read_text().split() == [str(name) for name in range(5)]  # once each, in order
    assert pool.join(10) and pool.queued == 0 and pool.running == 0


@pytest.mark.timeout(60)
def test_a_task_past_its_time_limit_hands_every_task_pipelined_behind_it_on(pools, tmp_path):
    pool = pools(1, depth=3)
    runs = tmp_path / "runs"
    slow = _held(pool, tmp_path, timeout=1.0)
    waiting = [submit(pool, log_run, str(runs), name) for name in range(3)]
    assert len(_pipelined(pool)) == 3, "the tasks were not pipelined: the test does not test it"
    failure = slow.get(timeout=30)
    assert type(failure) is Failure and failure.error == "TaskTimeout"
    for reply in waiting:
        value(reply.get(timeout=30))
    assert runs.read_text().split() == ["0", "1", "2"]
    assert pool.join(10) and pool.queued == 0 and pool.running == 0


@pytest.mark.timeout(60)
def test_cancelling_the_tasks_of_one_tag_spares_the_others_pipelined_behind_them(pools, tmp_path):
    pool = pools(1, depth=4)
    runs = tmp_path / "runs"
    running = _held(pool, tmp_path, "release")
    replies = {name: submit(pool, log_run, str(runs), name, tag="a" if name % 2 else "b") for name in range(6)}
    wait_for(lambda: len(_pipelined(pool)) == 4, what="four tasks to be pipelined")
    dropped = pool.cancel(lambda job: job.tag == "a")
    assert sorted(loads(job.task.args)[0][1] for job in dropped) == [1, 3, 5]
    (tmp_path / "release").touch()
    value(running.get(timeout=30))
    for name in (0, 2, 4):
        value(replies[name].get(timeout=30))
    assert pool.join(10) and pool.queued == 0
    assert sorted(runs.read_text().split()) == ["0", "2", "4"]  # the spared ones ran once, the others never
    assert not any(replies[name].ready() for name in (1, 3, 5))


@pytest.mark.timeout(10)
def test_a_job_is_encoded_once_however_often_it_is_offered() -> None:
    """Offering a job for pipelining, taking it back and sending it again reuses one encoding."""
    small = Job(Task(1, b"f", dumps(((1,), None)), None), lambda reply: None)
    parts, pipelinable = small.encoded()
    assert pipelinable
    assert small.encoded()[0] is parts
    large = Job(Task(2, b"f", b"x" * (defaults.PIPELINE_BYTES + 1), None), lambda reply: None)
    assert large.encoded()[1] is False
    assert any(part is large.task.args for part in large.encoded()[0])  # the payload is not copied


def test_pipelining_is_only_as_deep_as_the_limit_on_open_files_allows() -> None:
    from argon.pool import SPARE_FILES, files_needed, fitting_depth

    assert files_needed(2, 4) == 2 * (2 * 5 + 2) + SPARE_FILES
    assert fitting_depth(2, 4, 1024) == 4
    assert fitting_depth(64, 4, 1000) == 3  # 64 x (2 x 4 + 2) + 256 = 896 fits; depth 4 needs 1,024
    assert fitting_depth(128, 4, 1024) == 1
    assert fitting_depth(512, 4, 1024) == 0  # not even one pair to spare: no pipelining


@pytest.mark.timeout(30)
def test_a_pool_process_polls_for_its_next_task_only_while_tasks_come_close_together(monkeypatch) -> None:
    """The runner's task loop: a task sent soon after the last is found without sleeping;
    after a long wait the process sleeps at once, and polls again once tasks come quickly."""
    import select
    import socket as stdsocket
    import threading
    import types

    from argon import runner
    from argon.framing import frame

    poll = 0.2
    sleeps = []

    def counting_select(*args: Any) -> Any:
        if len(args) == 3:  # no timeout: the process sleeps until something arrives
            sleeps.append(1)
        return select.select(*args)

    monkeypatch.setattr(runner, "select", types.SimpleNamespace(select=counting_select))
    ours, theirs = stdsocket.socketpair(stdsocket.AF_UNIX, stdsocket.SOCK_SEQPACKET)
    stdin, feeder = os.pipe()
    tasks = runner._tasks(stdin, [theirs], 1 << 20, poll=poll)

    def after(delay: float, body: bytes) -> bytes:
        timer = threading.Timer(delay, ours.send, (body,))
        timer.start()
        try:
            return next(tasks)
        finally:
            timer.join()

    try:
        ours.send(b"first")
        assert next(tasks) == b"first" and not sleeps
        assert after(0.01, b"soon") == b"soon"
        assert not sleeps  # found while polling: nobody had to wake the process
        assert after(1.0, b"late") == b"late"
        assert len(sleeps) == 1  # polled for 0.2 s, then slept until the task came
        assert after(0.01, b"after a long wait") == b"after a long wait"
        assert len(sleeps) == 2  # the last wait was long: it slept at once
        assert after(0.01, b"close again") == b"close again"
        assert len(sleeps) == 2  # the last wait was short: polling again
        timer = threading.Timer(0.01, os.write, (feeder, frame(b"a large one, on the pipe")))
        timer.start()
        assert next(tasks) == b"a large one, on the pipe"
        timer.join()
        assert len(sleeps) == 2  # the poll watches the pipe too
        os.close(feeder)
        feeder = -1
        with pytest.raises(StopIteration):  # the worker closed its pipe: the loop ends
            next(tasks)
    finally:
        tasks.close()
        for fd in (stdin, feeder):
            if fd >= 0:
                os.close(fd)
        ours.close()
        theirs.close()
