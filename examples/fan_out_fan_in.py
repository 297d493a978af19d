"""Fan out many deferred tasks, fan their results back in, and chain a second stage.

Two ways to compute the sum of the squares of 0, 1, ..., N-1 over chunks of the range:

1. Fan-out/fan-in: ``defer`` one task per chunk (all of them are in flight at once),
   then call the deferreds and add up their partial sums.
2. A two-stage pipeline: for each chunk, stage 1 produces the chunk's squares and, as
   soon as that result is back, stage 2 (which sums them) is sent. Each chunk's chain
   runs in its own greenlet sharing the one client, so stage-2 tasks start while other
   chunks are still in stage 1.

Both totals are checked against the closed form (N-1)N(2N-1)/6.

Run it with ``python examples/fan_out_fan_in.py [--numbers N] [--chunks N]``: it starts a
small network of its own on loopback (a manager and two worker nodes) and stops it at
the end. To use a network that is already running instead::

    python examples/fan_out_fan_in.py --connect 127.0.0.1:8000 --key-file argon.key
"""

from __future__ import annotations

import argparse
import sys
import time

import gevent
from _network import add_network_options, network

from argon import Client


def positive(text: str) -> int:
    """Parse a positive integer (``1_000`` and ``1,000`` are accepted)."""
    value = int(text.replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def sum_of_squares(lo: int, hi: int) -> int:
    """A fan-out task: the sum of k*k for lo <= k < hi."""
    return sum(k * k for k in range(lo, hi))


def squares(lo: int, hi: int) -> list[int]:
    """Pipeline stage 1: the squares of lo, ..., hi-1."""
    return [k * k for k in range(lo, hi)]


def total(values: list[int]) -> int:
    """Pipeline stage 2: the sum of what stage 1 produced."""
    return sum(values)


def fan_out_fan_in(client: Client, chunks: list[tuple[int, int]]) -> int:
    """Defer one task per chunk, then gather the partial sums."""
    deferreds = [client.defer(sum_of_squares, chunk) for chunk in chunks]
    return sum(deferred() for deferred in deferreds)


def pipeline(client: Client, chunks: list[tuple[int, int]]) -> int:
    """Run stage 1 then stage 2 for every chunk, each chunk in its own greenlet."""

    def chain(lo: int, hi: int) -> int:
        values: list[int] = client.queue(squares, [lo, hi])  # blocks this greenlet only
        return int(client.queue(total, [values]))  # sent the moment stage 1 is back

    greenlets = [gevent.spawn(chain, lo, hi) for lo, hi in chunks]
    gevent.joinall(greenlets, raise_error=True)
    return sum(greenlet.value for greenlet in greenlets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deferred fan-out/fan-in and a two-stage pipeline.")
    parser.add_argument(
        "--numbers", metavar="N", type=positive, default=200_000, help="sum squares below N (default: 200,000)"
    )
    parser.add_argument("--chunks", type=positive, default=40, help="tasks per stage (default: 40)")
    add_network_options(parser)
    args = parser.parse_args(argv)

    n, count = args.numbers, min(args.chunks, args.numbers)
    chunks = [(n * i // count, n * (i + 1) // count) for i in range(count)]
    expected = (n - 1) * n * (2 * n - 1) // 6

    with network(args, nodes=2, workers=2) as client:
        started = time.perf_counter()
        fanned = fan_out_fan_in(client, chunks)
        fan_time = time.perf_counter() - started
        started = time.perf_counter()
        piped = pipeline(client, chunks)
        pipe_time = time.perf_counter() - started

    print(f"sum of k*k for 0 <= k < {n:,}; closed form (N-1)N(2N-1)/6 = {expected}")
    runs = (("fan-out/fan-in", fanned, count, fan_time), ("pipeline", piped, 2 * count, pipe_time))
    for name, value, tasks, seconds in runs:
        verdict = "ok" if value == expected else "WRONG"
        print(f"{name + ':':16}{value} from {tasks} tasks in {seconds:.2f}s ({verdict})")
    if fanned != expected or piped != expected:
        sys.exit("a total differs from the closed form")


if __name__ == "__main__":
    main()
