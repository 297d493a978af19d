"""Estimate pi with a Monte Carlo method spread over many tasks.

Each task draws ``--samples`` random points in the unit square (from its own seed, so a
run is reproducible) and counts those inside the quarter circle; the client sends every
task with ``defer`` at once, then collects the counts: pi ~ 4 * hits / points.

Run it with ``python examples/monte_carlo_pi.py [--tasks N] [--samples N] [--seed N]``:
it starts a small network of its own on loopback (a manager and two worker nodes) and
stops it at the end. To use a network that is already running instead::

    python examples/monte_carlo_pi.py --connect 127.0.0.1:8000 --key-file argon.key
"""

from __future__ import annotations

import argparse
import math
import random
import time

from _network import add_network_options, network


def positive(text: str) -> int:
    """Parse a positive integer (``1_000`` and ``1,000`` are accepted)."""
    value = int(text.replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def count_hits(samples: int, seed: int) -> int:
    """Count random points of the unit square that fall inside the quarter circle."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        if x * x + y * y <= 1.0:
            hits += 1
    return hits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Estimate pi with a Monte Carlo method over many tasks.")
    parser.add_argument("--tasks", type=positive, default=100, help="tasks to run (default: 100)")
    parser.add_argument("--samples", type=positive, default=20_000, help="points per task (default: 20,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first task (default: 0)")
    add_network_options(parser)
    args = parser.parse_args(argv)

    with network(args, nodes=2, workers=2) as client:
        started = time.perf_counter()
        # Fan out: every task is in flight before the first result is awaited.
        deferreds = [client.defer(count_hits, [args.samples, args.seed + i]) for i in range(args.tasks)]
        hits = sum(deferred() for deferred in deferreds)
        elapsed = time.perf_counter() - started

    points = args.tasks * args.samples
    estimate = 4 * hits / points
    error = estimate - math.pi
    print(f"pi ~ {estimate:.6f} from {points:,} samples in {args.tasks} tasks")
    print(f"error vs math.pi: {error:+.6f} ({abs(error) / math.pi:.4%})")
    rate = f"{args.tasks / elapsed:,.1f} tasks/s, {points / elapsed:,.0f} samples/s"
    print(f"{args.tasks} tasks in {elapsed:.2f}s: {rate}")


if __name__ == "__main__":
    main()
