"""The loop each pool process runs: read a task from stdin, run it, write the reply.

Started by :class:`argon.process.PoolProcess` (one of a :class:`argon.pool.Pool`) as
``python -m argon.runner PARENT_PID MAX_FRAME SOCKET_FD...``. Tasks come as frames on
stdin (large ones) or as messages on the inherited ``SOCK_SEQPACKET`` sockets, in turn
(small ones, maybe a few queued behind the running task); each gets exactly one
:class:`~argon.protocol.Result` or :class:`~argon.protocol.Failure` on stdout. Before
the first task the process announces itself with a :class:`~argon.protocol.Hello`.
After each reply it looks at the socket first: a task queued there starts at once; with
none queued, it keeps looking for a few tens of microseconds before it sleeps, while its
tasks come that close together (see :data:`argon.defaults.POLL_BEFORE_SLEEP`).

The process keeps private copies of its pipes and points file descriptors 0 and 1 at
``/dev/null`` and stderr, so a task that prints or reads stdin cannot corrupt the frame
stream. It exits on end of input, and is killed if its parent dies.

It imports no gevent: a pool process is a plain, single-threaded Python process.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator

from argon import defaults
from argon.errors import TASK_ERROR, MessageTooLarge
from argon.framing import Buffer, FrameBuffer, frame_parts
from argon.osutil import die_with_parent
from argon.protocol import VERSION, Failure, Hello, Result, Task, decode, encode_parts
from argon.serialize import LoadedFunctions, dumps, dumps_exception, loads


def _private_pipes() -> tuple[int, int]:
    stdin = os.dup(0)
    stdout = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return stdin, stdout


def _send(fd: int, parts: list[bytes]) -> None:
    """Write one frame of :func:`encode_parts` buffers with ``writev`` (a large result is not copied)."""
    parts = frame_parts(parts)
    if len(parts) == 1 and os.write(fd, parts[0]) == len(parts[0]):
        return  # the usual case: a small reply, taken by the pipe at once
    views = [memoryview(part) for part in parts]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


def _poll(fds: list[int], seconds: float) -> list[int]:
    """Those of ``fds`` that become readable within ``seconds``, yielding the CPU between looks."""
    end = time.perf_counter() + seconds
    while True:
        ready, _, _ = select.select(fds, [], [], 0)
        if ready or time.perf_counter() >= end:
            return ready
        os.sched_yield()


def _tasks(
    stdin: int, sockets: list[socket.socket], max_frame: int, poll: float = defaults.POLL_BEFORE_SLEEP
) -> Iterator[Buffer]:
    """Task bodies as they come, from the pipe or the sockets (in turn), until the pipe closes.

    The worker writes a frame on the pipe only to an idle process (one that has received
    every task sent to it), so the order between pipe and sockets is never in doubt.
    The sockets are shared with the worker, which may take a queued task back first: a
    receive that finds nothing is not an error (the next task comes on the same socket).

    With nothing queued, the process looks for its next task for up to ``poll`` seconds
    before it sleeps, as long as its last wait for one lasted less than four times that: a
    worker sending a stream of short tasks then need not wake it (which costs the worker
    far more than a send), and a process whose tasks come seldom sleeps at once.
    """
    frames: deque[Buffer] = deque()
    buffer = FrameBuffer(max_frame)
    turn = 0
    polling = poll > 0
    while True:
        if frames:
            yield frames.popleft()
            continue
        try:
            body = sockets[turn].recv(defaults.PIPELINE_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        else:
            turn = (turn + 1) % len(sockets)
            yield body
            continue
        fds = [stdin, sockets[turn].fileno()]
        waiting = time.perf_counter()
        ready = _poll(fds, poll) if polling else []
        if not ready:
            ready, _, _ = select.select(fds, [], [])
            polling = poll > 0 and time.perf_counter() - waiting < 4 * poll
        if stdin in ready:
            data = os.read(stdin, 1 << 20)
            if not data:
                return
            frames.extend(buffer.feed(data))


def run(task: Task, functions: LoadedFunctions) -> Result | Failure:
    """Run one task; every exception it raises becomes a ``TaskError`` failure."""
    try:
        func = functions.get(task.func)
        args, kwargs = loads(task.args)
        value = func(*args, **(kwargs or {}))
        return Result(task.id, dumps(value))
    except BaseException as exc:  # the task's own errors, SystemExit included, go to the client
        payload, message, text = dumps_exception(exc)
        return Failure(task.id, TASK_ERROR, message, payload, text)


def main(argv: list[str] | None = None) -> int:
    """Serve tasks on stdin until it closes."""
    args = sys.argv[1:] if argv is None else argv
    parent, max_frame = int(args[0]), int(args[1])
    # Ctrl-C, or a TERM sent to the whole process group (systemd's default), reaches pool
    # processes too: ignore both and let the worker drain; it kills us with SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)
    sockets = [socket.socket(fileno=int(fd)) for fd in args[2:]]
    stdin, stdout = _private_pipes()
    functions = LoadedFunctions()
    gc.freeze()  # the runner's own objects live as long as the process: full collections skip them
    _send(stdout, encode_parts(Hello(VERSION, "pool", str(os.getpid()))))
    for body in _tasks(stdin, sockets, max_frame):
        task = decode(body)
        if type(task) is not Task:
            return 2
        reply = run(task, functions)
        parts = encode_parts(reply)
        size = len(parts[0]) if len(parts) == 1 else sum(len(part) for part in parts)
        if size > max_frame:
            parts = encode_parts(
                Failure(
                    task.id,
                    MessageTooLarge.__name__,
                    f"the result of {size} bytes exceeds the {max_frame} byte limit (--max-frame)",
                )
            )
        _send(stdout, parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
