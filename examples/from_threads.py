"""Argon from plain threads: one client shared by a ``ThreadPoolExecutor``.

A threaded program (a web app, a script) needs no gevent: the client runs its network
I/O in a thread of its own, and each thread's ``queue()`` blocks only that thread.

    python examples/from_threads.py [--connect HOST:PORT] [--key-file FILE] [--threads 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

from _network import add_network_options, network


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One Argon client shared by threads.")
    add_network_options(parser)
    parser.add_argument("--threads", type=int, default=8, help="threads sharing the client")
    parser.add_argument("--calls", type=int, default=50, help="queue() calls per thread")
    args = parser.parse_args(argv)

    with network(args) as client:

        def work(n: int) -> int:
            return sum(client.queue(lambda x: x * x, [n * args.calls + i]) for i in range(args.calls))

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.threads) as threads:
            total = sum(threads.map(work, range(args.threads)))
        elapsed = time.monotonic() - started
        count = args.threads * args.calls
        print(f"{args.threads} threads x {args.calls} queue() calls: sum of squares = {total}")
        print(f"expected {sum(i * i for i in range(count))}; {count} round trips in {elapsed:.2f}s")

        started = time.monotonic()
        deferred = client.defer(time.sleep, [1.0])  # on its way at once
        spin = 0
        while time.monotonic() - started < 1.0:  # local work that never yields to gevent
            spin += 1
        deferred()
        print(f"1s of remote sleep overlapped 1s of local work: {time.monotonic() - started:.2f}s in all")


if __name__ == "__main__":
    main()
