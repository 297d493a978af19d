"""A pool of long-lived Python processes that run tasks one at a time each.

Each process is a fresh interpreter running :mod:`argon.runner`, started with
``gevent.subprocess`` and fed length-prefixed frames over its stdin and stdout pipes.
Exec'd children inherit no hub, greenlets or listening sockets from the worker, and
pipe I/O is cooperative on the worker's side. One greenlet per process takes jobs from
the pool's queue, writes the task to the pipe and waits for the reply.

A process that dies fails only its task, with :class:`~argon.errors.ProcessDied`, and is
replaced. A task that overruns its time limit has its process killed and fails with
:class:`~argon.errors.TaskTimeout`. With ``max_requests`` a process is retired after that
many tasks; its replacement is started while it runs its last task, so recycling does
not delay the queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import site
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.subprocess
import psutil

from argon import defaults
from argon.errors import ProcessDied, ProtocolError
from argon.protocol import Failure, Hello, Result, Task, decode, encode, frame, read_frame

log = logging.getLogger(__name__)

Reply = Result | Failure

START_TIMEOUT = 60.0
STOP_TIMEOUT = 2.0


def default_size() -> int:
    """The number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return psutil.cpu_count() or 1


def _child_env() -> dict[str, str]:
    """The environment for pool processes: ours, with this copy of argon importable."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site_dirs = {*site.getsitepackages(), site.getusersitepackages()}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in site_dirs and root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


class Job:
    """A task waiting for, or running on, a pool process.

    Attributes:
        task: The task to run; the reply carries the same id.
        done: Called once with the reply.
        tag: Anything the submitter wants to find the job by later.
    """

    __slots__ = ("done", "tag", "task")

    def __init__(self, task: Task, done: Callable[[Reply], None], tag: Any = None) -> None:
        self.task = task
        self.done = done
        self.tag = tag


class PoolProcess:
    """One pool process and its pipes."""

    def __init__(self, python: str, max_frame: int, env: dict[str, str]) -> None:
        self.max_frame = max_frame
        self.popen = gevent.subprocess.Popen(
            [python, "-m", "argon.runner", str(os.getpid()), str(max_frame)],
            stdin=gevent.subprocess.PIPE,
            stdout=gevent.subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self.pid: int = self.popen.pid
        self.tasks = 0
        self.started = time.time()
        self.alive = True

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for the process's hello.

        Raises:
            ProcessDied: It exited or did not report in time.
        """
        try:
            with gevent.Timeout(timeout, ProcessDied(f"pool process {self.pid} did not start in {timeout}s")):
                body = read_frame(self.popen.stdout, self.max_frame)
            if body is None or type(decode(body)) is not Hello:
                raise ProcessDied(f"pool process {self.pid} {self._exit_status()} while starting")
        except BaseException:
            self.kill()
            raise

    def run(self, task: Task) -> Reply:
        """Run one task and return its reply; a dead or overdue process becomes a failure."""
        self.tasks += 1
        timer = gevent.Timeout(task.timeout) if task.timeout else None
        try:
            if timer is not None:
                timer.start()
            self.popen.stdin.write(frame(encode(task)))
            self.popen.stdin.flush()
            body = read_frame(self.popen.stdout, self.max_frame)
            if body is not None:
                reply = decode(body)
                if type(reply) in (Result, Failure) and reply.id == task.id:
                    return reply
                self.kill()
                return Failure(task.id, "ProtocolError", f"pool process {self.pid} sent an unexpected reply")
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self.kill()
            return Failure(
                task.id,
                "TaskTimeout",
                f"task ran past its {task.timeout}s time limit; pool process {self.pid} was killed",
            )
        except (OSError, ProtocolError):
            pass  # a broken pipe or a torn frame: the process is gone; say how below
        finally:
            if timer is not None:
                timer.close()
        return Failure(task.id, "ProcessDied", f"pool process {self.pid} {self._exit_status()} while running the task")

    def _exit_status(self) -> str:
        self.alive = False
        try:
            code = self.popen.wait(timeout=STOP_TIMEOUT)
        except gevent.subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown signal"
            return f"was killed by signal {-code} ({name})"
        return f"exited with code {code}"

    def retire(self) -> None:
        """Close its input so it exits after its current task; kill it if it lingers."""
        self.alive = False
        try:
            self.popen.stdin.close()
            self.popen.wait(timeout=STOP_TIMEOUT)
        except (OSError, gevent.subprocess.TimeoutExpired):
            self.kill()
        self._close_pipes()

    def kill(self) -> None:
        """Kill the process at once and reap it."""
        self.alive = False
        try:
            self.popen.kill()
            self.popen.wait()
        except OSError:
            pass
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.popen.stdin, self.popen.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


class _Slot:
    """A place in the pool: the process filling it now, and its successor if one is starting."""

    __slots__ = ("greenlet", "process", "spare", "wake")

    def __init__(self, process: PoolProcess) -> None:
        self.process = process
        self.spare: gevent.Greenlet | None = None
        self.wake = gevent.event.Event()
        self.greenlet: gevent.Greenlet | None = None


class Pool:
    """A fixed number of pool processes fed from one FIFO queue of jobs.

    Args:
        size: Number of processes (default: CPUs this process may use).
        max_requests: Replace a process after it has run this many tasks (None: never).
        max_frame: Largest frame a process may send back.
        python: Interpreter to start the processes with.
    """

    def __init__(
        self,
        size: int | None = None,
        *,
        max_requests: int | None = None,
        max_frame: int = defaults.MAX_FRAME,
        python: str = sys.executable,
    ) -> None:
        self.size = size or default_size()
        self.max_requests = max_requests
        self.max_frame = max_frame
        self.python = python
        self.outstanding = 0
        self.running = 0
        self.completed = 0
        self.failed = 0
        self.replaced = 0
        self._env = _child_env()
        self._jobs: deque[Job] = deque()
        self._idle: list[gevent.event.Event] = []
        self._slots: list[_Slot] = []
        self._closing = False
        self._drained = gevent.event.Event()
        self._drained.set()

    @property
    def queued(self) -> int:
        """Jobs waiting for a free process."""
        return len(self._jobs)

    def _spawn_process(self) -> PoolProcess:
        delay = 0.1
        while True:
            try:
                process = PoolProcess(self.python, self.max_frame, self._env)
                process.wait_ready()
                return process
            except (OSError, ProcessDied) as exc:
                if self._closing:
                    raise
                log.error("cannot start a pool process (%s); retrying in %.1fs", exc, delay)
                gevent.sleep(delay)
                delay = min(delay * 2, 5.0)

    def start(self) -> None:
        """Start every process and wait until all are ready."""
        starting = [gevent.spawn(self._spawn_process) for _ in range(self.size)]
        gevent.joinall(starting, raise_error=True)
        for greenlet in starting:
            slot = _Slot(greenlet.value)
            slot.greenlet = gevent.spawn(self._serve, slot)
            self._slots.append(slot)
        log.info("pool of %d processes ready", self.size)

    def submit(self, job: Job) -> None:
        """Queue a job; a free process picks it up in submission order."""
        self._jobs.append(job)
        self.outstanding += 1
        self._drained.clear()
        if self._idle:
            self._idle.pop().set()

    def cancel(self, match: Callable[[Job], bool]) -> list[Job]:
        """Remove queued (not yet running) jobs for which ``match`` is true and return them."""
        dropped = [job for job in self._jobs if match(job)]
        if dropped:
            self._jobs = deque(job for job in self._jobs if not match(job))
            self.outstanding -= len(dropped)
            if not self.outstanding:
                self._drained.set()
        return dropped

    def _serve(self, slot: _Slot) -> None:
        while True:
            while not self._jobs:
                if self._closing:
                    return
                self._idle.append(slot.wake)
                slot.wake.wait()
                slot.wake.clear()
            job = self._jobs.popleft()
            self.running += 1
            try:
                reply = self._run(slot, job.task)
            finally:
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

    def _run(self, slot: _Slot, task: Task) -> Reply:
        process = slot.process
        if self.max_requests and process.tasks + 1 >= self.max_requests and slot.spare is None:
            slot.spare = gevent.spawn(self._spawn_process)  # warm up the successor now
        reply = process.run(task)
        if not process.alive:
            log.warning("%s", reply.message if type(reply) is Failure else f"pool process {process.pid} died")
            self._replace(slot)
        elif self.max_requests and process.tasks >= self.max_requests:
            gevent.spawn(process.retire)
            self._replace(slot)
        return reply

    def _replace(self, slot: _Slot) -> None:
        spare, slot.spare = slot.spare, None
        slot.process = spare.get() if spare is not None else self._spawn_process()
        self.replaced += 1

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running; False if ``timeout`` passed first."""
        return bool(self._drained.wait(timeout))

    def close(self, grace: float = 0.0) -> None:
        """Stop the pool: wait up to ``grace`` seconds for outstanding jobs, then kill the rest."""
        self._closing = True
        if grace:
            self.join(grace)
        for wake in self._idle:
            wake.set()
        for slot in self._slots:
            if slot.greenlet is not None:
                slot.greenlet.kill(block=False)
            if slot.spare is not None:
                slot.spare.kill(block=False)
            slot.process.kill()
        gevent.joinall([s.greenlet for s in self._slots if s.greenlet is not None], timeout=STOP_TIMEOUT)

    def processes(self) -> list[dict[str, Any]]:
        """Per-process figures: pid, tasks run, resident memory."""
        rows = []
        for slot in self._slots:
            process = slot.process
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
