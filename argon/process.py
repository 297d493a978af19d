"""One pool process: a fresh interpreter running :mod:`argon.runner`, and the pipes to it.

The process is started with ``gevent.subprocess`` and fed length-prefixed frames over
its stdin and stdout pipes; an exec'd child inherits no hub, greenlets or listening
sockets from the worker. :class:`PoolProcess` writes a task without blocking (the rest
of a large one when the pipe drains), reads the replies its pool's I/O watcher reports,
kills the process when its task overruns the time limit, and reaps it. Which job runs
where, and what happens when a process dies, is :class:`argon.pool.Pool`'s business.

Small tasks travel instead as messages on ``depth + 1`` ``SOCK_SEQPACKET`` socket pairs,
used in turn, whose receiving ends both the process and the worker hold. The worker may
queue up to ``depth`` tasks behind the running one (:meth:`PoolProcess.pipeline`): the
process takes the next as soon as it has written its reply, without waiting for the
worker, so a process running short tasks seldom sleeps, and the worker seldom has to wake
it. Until then the worker can take the newest of them back (:meth:`PoolProcess.take_back`):
a message is received whole by one reader only, so whoever receives it owns the task, and
it never runs twice. Only the newest is taken back, so the sockets that hold tasks are
always the ones the process will look at next, in its order.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import gevent.subprocess

from argon import defaults
from argon.errors import ProcessDied
from argon.framing import Buffer, FrameBuffer, frame_parts
from argon.protocol import Failure, Hello, Result, Task, decode, encode_parts
from argon.states import ProcessState, advance

Reply = Result | Failure

START_TIMEOUT = 60.0
READ_SIZE = 1 << 20
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031  # Linux: grow the pipes, so large payloads take fewer system calls
STOP_TIMEOUT = 2.0


class Job:
    """A task waiting for, or running on, a pool process.

    Attributes:
        task: The task to run; the reply carries the same id.
        done: Called once with the reply.
        tag: Anything the submitter wants to find the job by later.
    """

    __slots__ = ("_encoded", "arrived", "began", "done", "tag", "task")

    def __init__(self, task: Task, done: Callable[[Reply], None], tag: Any = None) -> None:
        self.task = task
        self.done = done
        self.tag = tag
        self.arrived = time.monotonic()
        self.began = 0.0  # when a process took it
        self._encoded: tuple[list[bytes], bool] | None = None

    def encoded(self) -> tuple[list[bytes], bool]:
        """The task's :func:`~argon.protocol.encode_parts` buffers, and whether it is small enough to pipeline.

        Encoded once: a job offered for pipelining, or taken back and sent again, reuses them.
        """
        if self._encoded is None:
            parts = encode_parts(self.task)
            size = len(parts[0]) if len(parts) == 1 else sum(len(part) for part in parts)
            self._encoded = parts, size <= defaults.PIPELINE_BYTES
        return self._encoded


class PoolProcess:
    """One pool process, its pipes and the jobs it is running and holds (see :class:`ProcessState`).

    Args:
        python: Interpreter to start it with.
        max_frame: Largest frame it may send back.
        env: Its environment.
        rescued: Given each pipelined job taken back before an overdue task's kill.
        depth: Most jobs that may wait behind its running one (0: none).
    """

    def __init__(
        self,
        python: str,
        max_frame: int,
        env: dict[str, str],
        rescued: Callable[[Job], None] | None = None,
        depth: int = defaults.PIPELINE_DEPTH,
    ) -> None:
        self._rescued = rescued
        self.depth = depth
        # Sockets used in turn, so each holds one task at most: the running one until the
        # process receives it, or one of those pipelined behind it. The worker sends on one
        # end of each and keeps a copy of the other, the process's, to take tasks back.
        self._sockets = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(depth + 1)]
        receivers = [receiver.fileno() for _, receiver in self._sockets]
        try:
            self.popen = gevent.subprocess.Popen(
                [python, "-m", "argon.runner", str(os.getpid()), str(max_frame), *map(str, receivers)],
                stdin=gevent.subprocess.PIPE,
                stdout=gevent.subprocess.PIPE,
                env=env,
                close_fds=True,
                pass_fds=receivers,
            )
        except BaseException:
            self._close_sockets()
            raise
        for pair in self._sockets:
            for end in pair:
                end.setblocking(False)
        self._turn = 0  # the socket the next task goes to (the process reads them in the same order)
        self.pid: int = self.popen.pid
        self.tasks = 0
        self.started = time.time()
        self.state = ProcessState.STARTING
        self.job: Job | None = None
        #: Jobs pipelined behind ``job``, oldest first, each with its socket: sent, and not
        #: known to have started.
        self.waiting: deque[tuple[Job, int]] = deque()
        self.streamed = False  # ``job`` came over the stdin pipe: nothing may be pipelined behind it
        self.began = 0.0  # when (monotonic) its current task was written to it
        self.spare: gevent.Greenlet | None = None  # its successor, warmed up by the pool before it retires
        self._to_child = self.popen.stdin.fileno()
        self._from_child = self.popen.stdout.fileno()
        for fd in (self._to_child, self._from_child):
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        loop = gevent.get_hub().loop
        self.readable = loop.io(self._from_child, 1)
        self._writable = loop.io(self._to_child, 2)
        self._timer: Any = None
        self._pending: list[Buffer] = []
        self._frames = FrameBuffer(max_frame)

    def __repr__(self) -> str:
        return f"<PoolProcess {self.pid} {self.state.value} tasks={self.tasks}>"

    def move(self, state: ProcessState) -> None:
        """Change state (see :data:`argon.states.MOVES`); a move to the same state is a no-op."""
        if state is not self.state:
            self.state = advance(self.state, state, self)  # type: ignore[assignment]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait (in a greenlet) for the process's hello.

        Raises:
            ProcessDied: It exited or did not report in time.
        """
        hub = gevent.get_hub()
        try:
            with gevent.Timeout(timeout, ProcessDied(f"pool process {self.pid} did not start in {timeout}s")):
                frames: list[Buffer] = []
                while not frames:
                    try:
                        data = os.read(self._from_child, READ_SIZE)
                    except BlockingIOError:
                        hub.wait(self.readable)
                        continue
                    if not data:
                        break
                    frames = self._frames.feed(data)
            if not frames or type(decode(frames[0])) is not Hello:
                raise ProcessDied(f"pool process {self.pid} {self.exit_status()} while starting")
            self.move(ProcessState.IDLE)
        except BaseException:
            self.kill()
            raise

    def begin(self, job: Job, parts: list[bytes], small: bool) -> None:
        """Hand ``job`` (its task encoded as ``parts``) to the idle process.

        A small task goes as one message on the socket, a large one over the stdin pipe
        (the rest later if the pipe is full). If the task has a time limit and overruns
        it, the process is killed (its state is then ``OVERDUE``) and the pool's reader
        sees end of file.
        """
        self.streamed = not small or self._send(parts) is None
        self.start_job(job)
        if self.streamed:
            self._pending = list(frame_parts(parts))  # a large payload is not copied
            if not self._write():
                self._writable.start(self._write_more)

    def start_job(self, job: Job) -> None:
        """Count ``job`` as running from now: it was just sent, or the pipelined job's turn has come."""
        self.move(ProcessState.BUSY)
        self.job = job
        self.began = time.monotonic()
        self.tasks += 1
        if job.task.timeout:
            self._timer = gevent.get_hub().loop.timer(job.task.timeout)
            self._timer.start(self._overdue)

    @property
    def full(self) -> bool:
        """Whether no more jobs may be pipelined behind the running one."""
        return len(self.waiting) >= self.depth

    def pipeline(self, job: Job, parts: list[bytes]) -> bool:
        """Queue a small task behind the running one and those before it; False if the socket would not take it."""
        assert self.job is not None and not self.full and not self.streamed
        sent = self._send(parts)
        if sent is None:
            return False
        self.waiting.append((job, sent))
        return True

    def promote(self) -> Job:
        """The process has replied to its running job, so it has taken the oldest pipelined one: now running."""
        job, _ = self.waiting.popleft()
        self.start_job(job)
        return job

    def take_back(self) -> Job | None:
        """Take back the newest pipelined job, or None if the process has received it (or there is none).

        Whoever receives the message owns the task, so it never runs twice. A process that
        has received the newest has received every older one too.
        """
        if not self.waiting:
            return None
        job, which = self.waiting[-1]
        try:
            body = self._sockets[which][1].recv(defaults.PIPELINE_BYTES, socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError: the process has it
            return None
        taken = decode(body)
        assert isinstance(taken, Task) and taken.id == job.task.id, "each socket holds one task at most"
        self._turn = which  # the process will look there for its next task
        self.waiting.pop()
        return job

    def take_back_all(self) -> list[Job]:
        """Take back every pipelined job the process has not received, oldest first."""
        taken = []
        while (job := self.take_back()) is not None:
            taken.append(job)
        taken.reverse()
        return taken

    def _send(self, parts: list[bytes]) -> int | None:
        """Send a task on the socket whose turn it is; which one, or None if it would not take it."""
        turn = self._turn
        try:
            self._sockets[turn][0].sendmsg(parts)
        except OSError:  # full (or the process is gone): the caller uses the pipe, or the queue
            return None
        self._turn = (turn + 1) % len(self._sockets)
        return turn

    def _close_sockets(self) -> None:
        for pair in self._sockets:
            for end in pair:
                end.close()

    def _overdue(self) -> None:
        """Hub callback: the running task is overdue; kill the process (the reader reports it).

        The jobs pipelined behind it are taken back first and handed to ``rescued``. If the
        process has taken one of them already, it has replied to the overdue task (the
        reply is on its way): it is not killed.
        """
        if self.waiting:
            count = len(self.waiting)
            taken = self.take_back_all()
            if self._rescued is not None:
                for job in reversed(taken):  # newest first: each goes to the front of the queue
                    self._rescued(job)
            if len(taken) < count:
                return
        self.move(ProcessState.OVERDUE)
        with contextlib.suppress(OSError):
            self.popen.kill()

    def _write(self) -> bool:
        """Write as much of the pending task as the pipe takes; True once it is all out."""
        try:
            written = os.writev(self._to_child, self._pending)
        except BlockingIOError:
            return False
        except OSError:
            self._pending = []  # the process is gone: the reader sees end of file, reports it
            return True
        for index, part in enumerate(self._pending):
            if written < len(part):
                self._pending = [memoryview(part)[written:], *self._pending[index + 1 :]]
                return False
            written -= len(part)
        self._pending = []
        return True

    def _write_more(self) -> None:
        if self._write():
            self._writable.stop()

    def read_replies(self) -> list[Buffer] | None:
        """Frames available now (maybe none); None at end of file (the process died)."""
        try:
            data = os.read(self._from_child, READ_SIZE)
        except BlockingIOError:
            return []
        except OSError:
            return None
        return self._frames.feed(data) if data else None

    def finish(self) -> Job | None:
        """Forget the running job (its reply is in) and return it; a busy process is idle again."""
        if self.state is ProcessState.BUSY:
            self.move(ProcessState.IDLE)
        job, self.job = self.job, None
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._pending = []
        self._writable.stop()
        self.streamed = False
        return job

    def exit_status(self) -> str:
        """Reap the process (in a greenlet) and describe how it ended."""
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
        """Stop reading it and let it exit: close its input, and kill it if it lingers (in a greenlet)."""
        self.move(ProcessState.RETIRING)
        self.readable.stop()
        gevent.spawn(self._exit)

    def _exit(self) -> None:
        """Greenlet: close its input so it exits; kill it if it lingers."""
        try:
            self.popen.stdin.close()
            self.popen.wait(timeout=STOP_TIMEOUT)
        except (OSError, gevent.subprocess.TimeoutExpired):
            self.kill()
        self.close()

    def kill(self) -> None:
        """Kill the process at once and reap it."""
        with contextlib.suppress(OSError):
            self.popen.kill()
            self.popen.wait()
        self.close()

    def close(self) -> None:
        """Release its watchers and pipes once it has exited (idempotent)."""
        if self.state is ProcessState.DEAD:
            return
        self.move(ProcessState.DEAD)
        self.readable.close()
        self._writable.close()
        if self._timer is not None:
            self._timer.close()
        for pipe in (self.popen.stdin, self.popen.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        self._close_sockets()
