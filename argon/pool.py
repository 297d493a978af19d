"""A pool of long-lived Python processes that run tasks one at a time each.

Each process is a :class:`~argon.process.PoolProcess`: a fresh interpreter running
:mod:`argon.runner`, fed frames over its pipes. This module schedules jobs across them
and replaces the ones that die or retire.

The pool is driven by the hub: a task is written to an idle process's pipe by whoever
submits it, and the reply is read by an I/O watcher callback that hands it on and
gives the process its next job, so the common path costs no greenlet switch. Only the
rare paths (starting, replacing and reaping processes) run in greenlets.

Jobs wait in the pool's one queue. So that a process need not idle for a round trip to
the worker between short tasks, a few small jobs may also wait behind a process's running
task (*pipelined*, up to ``defaults.PIPELINE_DEPTH`` per process, see
:mod:`argon.process`): the process starts the next as soon as it has replied. Until then
the pool can take them back (the newest first), and does so whenever another process has
nothing to do, when they are cancelled, and when their process dies; so no task waits
behind a running one while another process of the pool is free, and none runs twice.

A process that dies fails only its task, with :class:`~argon.errors.ProcessDied`, and is
replaced. A task that overruns its time limit has its process killed and fails with
:class:`~argon.errors.TaskTimeout`. With ``max_requests`` a process is retired after that
many tasks; its replacement is started while it runs its last task, so recycling does
not delay the queue.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import psutil

from argon import defaults
from argon.backoff import Backoff
from argon.errors import ProcessDied, ProtocolError, TaskTimeout
from argon.history import Recorder
from argon.osutil import importable, raise_open_files
from argon.process import Job, PoolProcess, Reply
from argon.protocol import Failure, Result, decode
from argon.states import ProcessState

log = logging.getLogger(__name__)


def default_size() -> int:
    """The number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return psutil.cpu_count() or 1


#: Open files a worker keeps for everything but its pool processes: its connections, its
#: listening socket, logs, a process being started.
SPARE_FILES = 256


def files_needed(size: int, depth: int) -> int:
    """Open files a worker needs for ``size`` processes with ``depth`` tasks pipelined behind each.

    Each process costs its two pipes and both ends of its ``depth + 1`` task sockets.
    """
    return size * (2 * (depth + 1) + 2) + SPARE_FILES


def fitting_depth(size: int, depth: int, open_files: int) -> int:
    """The deepest pipelining, up to ``depth``, whose sockets fit in ``open_files`` (0: none)."""
    while depth and files_needed(size, depth) > open_files:
        depth -= 1
    return depth


class Pool:
    """A fixed number of pool processes fed from one FIFO queue of jobs.

    Args:
        size: Number of processes (default: CPUs this process may use).
        max_requests: Replace a process after it has run this many tasks (None: never).
        max_frame: Largest frame a process may send back.
        python: Interpreter to start the processes with.
        on_broken: Called with the reason when a process cannot be replaced even after
            the bounded retries of ``restart`` (the pool runs on with fewer processes; with
            none left, its queued jobs fail with ``ProcessDied``).
        restart: Makes the :class:`~argon.backoff.Backoff` of each attempt to start a process.
        observe: Called with each task's run time in seconds (from the moment it was
            written to its process to its reply), as the reply is delivered.
        pipeline: Whether small jobs may now wait behind running ones (None: always);
            a worker allows it only while its tasks are short (see :class:`~argon.flow.Prefetch`).
        depth: Most jobs that may wait behind each running one.
    """

    def __init__(
        self,
        size: int | None = None,
        *,
        max_requests: int | None = None,
        max_frame: int = defaults.MAX_FRAME,
        python: str = sys.executable,
        on_broken: Callable[[str], None] | None = None,
        restart: Callable[[], Backoff] = Backoff.pool_start,
        observe: Callable[[float], None] | None = None,
        pipeline: Callable[[], bool] | None = None,
        depth: int = defaults.PIPELINE_DEPTH,
    ) -> None:
        self.size = size or default_size()
        self.depth = fitting_depth(self.size, depth, raise_open_files(files_needed(self.size, depth)))
        self._observe = observe
        self._pipeline = pipeline
        self.max_requests = max_requests
        self.max_frame = max_frame
        self.python = python
        self._on_broken = on_broken
        self._restart = restart
        #: Why no process can start, while none is left (None: the pool is whole or mending).
        self.broken: str | None = None
        self.outstanding = 0
        self.running = 0
        self.completed = 0
        self.failed = 0
        self.replaced = 0
        self._env = importable(dict(os.environ))  # tasks see the worker's environment
        self._jobs: deque[Job] = deque()
        self._pipelined = 0  # jobs waiting behind running ones (``process.waiting``)
        self.recorder = Recorder()  # task wait and run times, for the dashboard
        self._idle: list[PoolProcess] = []
        self._processes: list[PoolProcess] = []
        self._closing = False
        self._drained = gevent.event.Event()
        self._drained.set()

    @property
    def queued(self) -> int:
        """Jobs waiting to start: in the queue, or pipelined behind a running job."""
        return len(self._jobs) + self._pipelined

    def _spawn_process(self) -> PoolProcess:
        """Start one process, retrying a bounded number of times.

        Raises:
            ProcessDied: No process would start (or the pool is closing).
        """
        backoff = self._restart()
        while True:
            try:
                process = PoolProcess(self.python, self.max_frame, self._env, self._rescue, self.depth)
                process.wait_ready()
                return process
            except (OSError, ProcessDied) as exc:
                wait = None if self._closing else backoff.next_delay()
                if wait is None:
                    tries = backoff.tries + 1
                    raise ProcessDied(f"cannot start a pool process ({tries} attempts; last: {exc})") from None
                log.error("cannot start a pool process (%s); retrying in %.1fs (retry %d)", exc, wait, backoff.tries)
                gevent.sleep(wait)

    def start(self) -> None:
        """Start every process and wait until all are ready.

        Raises:
            ProcessDied: A process would not start (the others are stopped).
        """
        starting = [gevent.spawn(self._spawn_process) for _ in range(self.size)]
        gevent.joinall(starting)
        failed = [greenlet.exception for greenlet in starting if not greenlet.successful()]
        if failed:
            for greenlet in starting:
                if greenlet.successful():
                    greenlet.value.kill()
            raise failed[0] or ProcessDied("a pool process would not start")
        for greenlet in starting:
            self._enlist(greenlet.value)
        log.info("pool of %d processes ready", self.size)

    def _enlist(self, process: PoolProcess) -> None:
        """Put a ready process to work."""
        if self._closing:
            process.kill()
            return
        self._processes.append(process)
        self.broken = None
        process.readable.start(self._on_readable, process)
        self._next(process)

    def oldest_arrival(self) -> float | None:
        """When (monotonic) the job that has waited longest for a process arrived; None if none waits."""
        waiting = [process.waiting[0][0].arrived for process in self._processes if process.waiting]
        if self._jobs:
            waiting.append(self._jobs[0].arrived)
        return min(waiting, default=None)

    def submit(self, job: Job) -> None:
        """Queue a job; free processes take jobs in submission order.

        With no process left and none able to start (see ``on_broken``), the job fails at
        once with ``ProcessDied`` instead of waiting for ever.
        """
        if self.broken is not None and not self._processes:
            self._fail(job, f"no pool process can start: {self.broken}")
            return
        self.outstanding += 1
        self._drained.clear()
        if self._idle and not self._jobs:
            self._begin(self._idle.pop(), job)
            return
        self._jobs.append(job)
        if self._pipelined < len(self._processes) * self.depth:
            # Behind the busy process with the fewest waiting, so the lines grow evenly.
            shortest = None
            for process in self._processes:
                if (
                    process.job is not None
                    and not process.full
                    and not process.streamed
                    and (shortest is None or len(process.waiting) < len(shortest.waiting))
                ):
                    shortest = process
            if shortest is not None:
                self._fill(shortest)

    def _begin(self, process: PoolProcess, job: Job) -> None:
        self.running += 1
        if self.max_requests and process.tasks + 1 >= self.max_requests and process.spare is None:
            process.spare = gevent.spawn(self._spawn_process)  # warm up its successor now
        job.began = self.recorder.started(job.arrived)
        process.begin(job, *job.encoded())
        self._fill(process)

    def _fill(self, process: PoolProcess) -> bool:
        """Pipeline the queue's first jobs behind ``process``'s running one, as far as it may; True if any."""
        if (
            not self._jobs
            or process.job is None
            or process.full
            or process.streamed
            or process.state is not ProcessState.BUSY
            or (self._pipeline is not None and not self._pipeline())
        ):
            return False
        filled = False
        jobs = self._jobs
        while jobs and not process.full:
            if self.max_requests and process.tasks + len(process.waiting) + 1 >= self.max_requests:
                break  # its last task: nothing may wait behind it for the successor
            parts, small = jobs[0].encoded()
            if not small or not process.pipeline(jobs[0], parts):
                break
            jobs.popleft()
            self._pipelined += 1
            filled = True
        return filled

    def _take_back(self, process: PoolProcess, refill: bool = True) -> Job | None:
        """The newest job pipelined behind ``process`` if it has not started (see :meth:`PoolProcess.take_back`).

        With ``refill``, the queue's first jobs take its place.
        """
        job = process.take_back()
        if job is None:
            return None
        self._pipelined -= 1
        if refill:
            self._fill(process)
        return job

    def _rescue(self, job: Job) -> None:
        """A job pipelined behind a task that ran past its time limit was taken back: run it elsewhere."""
        self._pipelined -= 1
        self._jobs.appendleft(job)
        if self._idle:
            self._begin(self._idle.pop(), self._jobs.popleft())

    def _next(self, process: PoolProcess) -> None:
        """Give a process that has finished its job the next one, or mark it idle.

        Its own oldest pipelined job if it has one; else the newest job pipelined behind
        the process with the longest line (so none waits behind a running task while this
        one is free); else the queue's first.
        """
        if process.waiting:
            promoted = process.promote()  # it took the job after writing its reply; may have run it already
            self._pipelined -= 1
            self.running += 1
            promoted.began = self.recorder.started(promoted.arrived)
            self._fill(process)
            return
        for other in sorted(self._pipelining(), key=_waiting, reverse=True):
            job = self._take_back(other)
            if job is not None:
                self._begin(process, job)
                return
        if self._jobs:
            self._begin(process, self._jobs.popleft())
        else:
            self._idle.append(process)

    def _pipelining(self) -> list[PoolProcess]:
        """The processes with jobs pipelined behind their running one."""
        if not self._pipelined:
            return []
        return [process for process in self._processes if process.waiting]

    def _on_readable(self, process: PoolProcess) -> None:
        """Hub callback: a process has written (a reply, or end of file)."""
        frames = process.read_replies()
        if frames is None:
            self._lost(process)
            return
        for body in frames:
            job = process.job
            try:
                reply = decode(body)
                if job is None or not isinstance(reply, (Result, Failure)) or reply.id != job.task.id:
                    raise ProtocolError("unexpected reply")
            except ProtocolError:
                process.popen.kill()
                self._lost(process, f"pool process {process.pid} sent an unexpected reply")
                return
            self._deliver(process, reply)
            if process.state is ProcessState.OVERDUE:
                # Its time limit ran out just as the reply came: the reply stands, but the
                # process is being killed, so it takes no further job.
                self._lost(process)
                return
            if self.max_requests and process.tasks >= self.max_requests:
                self._retire(process)
            else:
                self._next(process)

    def _deliver(self, process: PoolProcess, reply: Reply) -> None:
        job = process.finish()
        assert job is not None
        self.recorder.finished(job.began)
        if self._observe is not None:
            self._observe(time.monotonic() - process.began)
        self.running -= 1
        self.outstanding -= 1
        if type(reply) is Result:
            self.completed += 1
        else:
            self.failed += 1
        try:
            job.done(reply)
        except Exception:
            log.exception("error delivering the reply to task %s", job.task.id)
        if not self.outstanding:
            self._drained.set()

    def _lost(self, process: PoolProcess, why: str = "") -> None:
        """Stop reading a process that is gone or going, and reap it in a greenlet (see :meth:`_died`)."""
        process.readable.stop()
        gevent.spawn(self._died, process, why)

    def _died(self, process: PoolProcess, why: str = "") -> None:
        """Greenlet: fail the dead process's task with how it ended, and replace it."""
        status = process.exit_status()
        overdue = process.state is ProcessState.OVERDUE
        unstarted = process.take_back_all()
        self._pipelined -= len(unstarted)
        self._jobs.extendleft(reversed(unstarted))  # they never started: they run elsewhere, first
        while process.waiting:  # it took the job after its last reply, and died on it
            lost, _ = process.waiting.popleft()
            self._pipelined -= 1
            self.outstanding -= 1
            self._fail(lost, f"pool process {process.pid} {status} while running the task")
        job = process.job
        if job is not None:
            task = job.task
            if overdue:
                reply = Failure(
                    task.id,
                    TaskTimeout.__name__,
                    f"task ran past its {task.timeout}s time limit; pool process {process.pid} was killed",
                )
            else:
                reply = Failure(
                    task.id, ProcessDied.__name__, why or f"pool process {process.pid} {status} while running the task"
                )
            log.warning("%s", reply.message)  # always a Failure here
            self._deliver(process, reply)
        elif not self._closing and not overdue:
            log.warning("idle pool process %d %s", process.pid, status)
        process.close()
        self._replace(process)
        while self._idle and self._jobs:
            self._begin(self._idle.pop(), self._jobs.popleft())
        if not self.outstanding:
            self._drained.set()

    def _retire(self, process: PoolProcess) -> None:
        process.retire()
        self._replace(process)

    def _replace(self, process: PoolProcess) -> None:
        """Take ``process`` out of the pool and bring in its successor when it is ready."""
        if process in self._processes:
            self._processes.remove(process)
        if process in self._idle:
            self._idle.remove(process)
        if self._closing:
            return
        self.replaced += 1
        spare, process.spare = process.spare, None
        successor = spare if spare is not None else gevent.spawn(self._spawn_process)
        successor.link_value(lambda done: self._enlist(done.value))
        successor.link_exception(lambda done: self._broken(done.exception))

    def _broken(self, error: BaseException | None) -> None:
        """A process could not be replaced: say so; with no process left, fail what waits."""
        if self._closing:
            return
        reason = str(error)
        log.critical("%s; the pool runs %d of its %d processes", reason, len(self._processes), self.size)
        if not self._processes:  # nothing would ever run the queued jobs
            self.broken = reason
            for job in self.cancel(lambda job: True):
                self._fail(job, f"no pool process can start: {reason}")
        if self._on_broken is not None:
            self._on_broken(reason)

    def _fail(self, job: Job, why: str) -> None:
        """Fail a job that never reached a process."""
        self.failed += 1
        try:
            job.done(Failure(job.task.id, ProcessDied.__name__, why))
        except Exception:
            log.exception("error delivering the reply to task %s", job.task.id)

    def cancel(self, match: Callable[[Job], bool], limit: int | None = None) -> list[Job]:
        """Remove queued (not yet running) jobs for which ``match`` is true and return them.

        They will never run here. With ``limit``, at most that many, the newest first (those
        that would wait longest); either way they are returned oldest first.
        Jobs pipelined behind running ones are taken back too, unless their process has
        just started them; they count as older than those in the queue. (Jobs pipelined
        behind a taken one that do not match go back to the front of the queue.)
        """
        if limit is None:
            dropped = [job for job in self._jobs if match(job)]
        else:
            dropped = []
            for job in reversed(self._jobs):
                if len(dropped) >= limit:
                    break
                if match(job):
                    dropped.append(job)
            dropped.reverse()
        if dropped:
            gone = set(map(id, dropped))
            self._jobs = deque(job for job in self._jobs if id(job) not in gone)
        taken: list[Job] = []
        spared: list[Job] = []
        for process in sorted(self._pipelining(), key=_newest_arrival, reverse=True):
            deepest = next((index for index, (job, _) in enumerate(process.waiting) if match(job)), None)
            while deepest is not None and len(process.waiting) > deepest:
                if limit is not None and len(dropped) + len(taken) >= limit:
                    break
                back = self._take_back(process, refill=False)
                if back is None:
                    break  # it has received the rest
                (taken if match(back) else spared).append(back)
        if spared:
            self._jobs.extendleft(sorted(spared, key=_arrival, reverse=True))
        dropped[:0] = sorted(taken, key=_arrival)
        if dropped:
            self.outstanding -= len(dropped)
            if not self.outstanding:
                self._drained.set()
        return dropped

    def youngest(self, now: float) -> float | None:
        """How long ago the newest running task started, if every process is busy; else None.

        While none of the processes is free, a queued job waits at least until one of
        them finishes: if even the newest task has run long, they may all run long.
        """
        if self._idle or not self.running or self.running < len(self._processes):
            return None
        return now - max(process.began for process in self._processes)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running; False if ``timeout`` passed first."""
        return bool(self._drained.wait(timeout))

    def close(self, grace: float = 0.0) -> None:
        """Stop the pool: wait up to ``grace`` seconds for outstanding jobs, then kill the rest."""
        self._closing = True
        if grace:
            self.join(grace)
        for process in self._processes:
            spare = process.spare
            if spare is not None:
                if spare.successful():
                    spare.value.kill()  # a successor that was already warmed up
                else:
                    spare.kill(block=False)
            process.kill()
        self._processes = []
        self._idle = []

    def running_tags(self) -> Counter[Any]:
        """How many running jobs carry each tag."""
        return Counter(process.job.tag for process in self._processes if process.job is not None)

    def processes(self) -> list[dict[str, Any]]:
        """Per-process figures: pid, tasks run, resident memory."""
        rows = []
        for process in self._processes:
            try:
                rss = psutil.Process(process.pid).memory_info().rss
            except psutil.Error:
                rss = 0
            rows.append(
                {
                    "pid": process.pid,
                    "tasks": process.tasks,
                    "rss": rss,
                    "uptime": round(time.time() - process.started, 1),
                }
            )
        return rows


def _waiting(process: PoolProcess) -> int:
    """How many jobs wait behind ``process``'s running one (for sorting)."""
    return len(process.waiting)


def _newest_arrival(process: PoolProcess) -> float:
    """When the newest job pipelined behind ``process`` arrived (for sorting)."""
    return process.waiting[-1][0].arrived if process.waiting else 0.0


def _arrival(job: Job) -> float:
    return job.arrived
