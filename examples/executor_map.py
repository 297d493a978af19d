"""``argon.Executor``: code written for ``concurrent.futures`` runs on Argon unchanged.

Without ``--connect`` the executor starts (and stops) a local network of its own; with
it, the executor uses that manager. ``map(..., chunksize=N)`` sends N items per task.

    python examples/executor_map.py [--connect HOST:PORT] [--key-file FILE] [--items 40000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import time

from _network import add_network_options

import argon


def is_prime(n: int) -> bool:
    """Trial division: enough work per item to be worth sending."""
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="concurrent.futures code on Argon.")
    add_network_options(parser)
    parser.add_argument("--items", type=int, default=40_000, help="numbers to test for primality")
    parser.add_argument("--chunksize", type=int, default=64, help="items per task")
    args = parser.parse_args(argv)

    if args.connect is not None:
        host, port = args.connect
        executor = argon.Executor(f"{host}:{port}", key_file=args.key_file)
    else:
        executor = argon.Executor(max_workers=2, key_file=args.key_file)
    with executor:
        future = executor.submit(pow, 2, 100)
        print(f"executor.submit(pow, 2, 100).result() = {future.result()}")
        started = time.monotonic()
        primes = sum(executor.map(is_prime, range(args.items), chunksize=args.chunksize))
        elapsed = time.monotonic() - started
        print(f"primes below {args.items}: {primes} (map, chunksize={args.chunksize}, {elapsed:.2f}s)")
        futures = [executor.submit(math.factorial, n) for n in (10, 20, 30)]
        done, _ = concurrent.futures.wait(futures, timeout=60)
        print(f"concurrent.futures.wait: {len(done)} of {len(futures)} done; 10! = {futures[0].result()}")


if __name__ == "__main__":
    main()
