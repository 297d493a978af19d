"""Lightweight stand-in workers: many worker connections to one manager from one process.

Run as ``python -m bench.standins HOST:PORT COUNT CAPACITY FREE [PREFETCH]``. Each stand-in
connects with ``role="worker"``, registers ``CAPACITY`` processes of which ``FREE`` are free,
keeps its link alive with heartbeats, and answers every task it is sent at once with
``Result(id, dumps(None))`` (it runs nothing). With ``PREFETCH`` (and free processes) it
grants a credit of ``FREE + PREFETCH`` tasks, as a real worker does whose tasks take no
time, and answers a ``Reclaim`` with an empty ``Handback`` (it holds nothing unstarted:
it answers each task as it arrives). Once all have registered it prints
``standins ready COUNT``; it exits when its parent dies or after ``LIFETIME`` seconds,
whichever comes first (the benchmark kills its process group long before).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import gevent
import gevent.pool

from argon.connection import Connection
from argon.handshake import connect
from argon.protocol import Credit, Handback, Message, Reclaim, Register, Result, Task
from argon.runner import die_with_parent
from argon.serialize import dumps

LIFETIME = 900.0
NONE = dumps(None)


def stand_in(host: str, port: int, number: int, capacity: int, free: int, prefetch: int = 0) -> Connection:
    """Connect and register one stand-in; returns its connection (not yet served)."""
    conn = connect(host, port, role="worker", name=f"standin-{number}")
    conn.send_now(Register(f"standin-{os.getpid()}-{number}", "127.0.0.1", 0, capacity, free, os.getpid()))
    if prefetch and free:
        conn.send_now(Credit(free + prefetch, free))
    return conn


def serve(conn: Connection) -> None:
    """Answer every task at once; heartbeat like a real worker."""

    def on_message(msg: Message) -> None:
        if type(msg) is Task:
            conn.send(Result(msg.id, NONE))
        elif type(msg) is Reclaim:
            conn.send(Handback([], "nothing waits"))

    conn.serve(on_message)


def main(argv: list[str]) -> int:
    """Start the stand-ins, report readiness, serve until killed (at most ``LIFETIME`` seconds)."""
    die_with_parent(os.getppid())
    host, _, port = argv[0].rpartition(":")
    count, capacity, free = int(argv[1]), int(argv[2]), int(argv[3])
    prefetch = int(argv[4]) if len(argv) > 4 else 0
    dialer = gevent.pool.Pool(50)
    conns: list[Any] = dialer.map(lambda n: stand_in(host, int(port), n, capacity, free, prefetch), range(count))
    servers = [gevent.spawn(serve, conn) for conn in conns]
    print(f"standins ready {len(conns)}", flush=True)
    gevent.sleep(LIFETIME)
    for conn in conns:
        conn.close("stand-in stopped")
    gevent.joinall(servers, timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
